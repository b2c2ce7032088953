"""Colours as the browser computes them, for the tests that check a theme's contrast."""


def luminance(css_color: str) -> float:
    red, green, blue = (int(part) / 255 for part in css_color[css_color.index("(") + 1 : -1].split(",")[:3])
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue
