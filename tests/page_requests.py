"""What the chat page sent: the browser tests read its API requests through Playwright."""

from email.parser import BytesParser
from email.policy import default as email_policy

from playwright.sync_api import Request


def form_fields(request: Request) -> dict:
    """The multipart form a page request carried, as {name: value}."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=email_policy).parsebytes(head + (request.post_data_buffer or b""))
    return {part.get_param("name", header="content-disposition"): part.get_content() for part in message.iter_parts()}
