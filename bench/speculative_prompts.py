"""bench.speculative's fixed prompts: grounded tasks, whose replies repeat runs of the prompt (what prompt lookup
drafts from), and open-ended chat, whose replies mostly do not."""

GROUNDED = {
    "code fix": (
        "Fix the bug in this Python function and give back the whole corrected function, nothing else:\n\n"
        "def average_price(items):\n"
        "    total = 0\n"
        "    count = 0\n"
        "    for item in items:\n"
        "        if item.price is not None:\n"
        "            total = total + item.price\n"
        "            count = count + 1\n"
        "    return total / count if count > 0 else totl\n"
    ),
    "paragraph rewrite": (
        "Rewrite this paragraph, changing only 'recieve' to 'receive' and keeping every other word:\n\n"
        "Customers who order before noon will recieve their parcel the next working day. Orders placed after "
        "noon are packed the following morning and shipped with the first courier of the day. Customers who live "
        "outside the city should allow one more day for delivery."
    ),
    "extraction": (
        "List every date in this email, one per line, each with the sentence it appears in:\n\n"
        "Hi Sam, the board meets on 14 March 2025 to approve the budget. The auditors arrive on 2 April 2025 and "
        "stay until 4 April 2025. Please send your figures before 28 February 2025, and book the hall for "
        "the summer party on 21 June 2025. Thanks, Alex"
    ),
    "quote": (
        "Quote the second paragraph of this text word for word:\n\n"
        "The river rises in the hills above the town and runs for forty miles to the sea.\n\n"
        "In spring the melting snow swells it, and the old stone bridge at the market square has twice been "
        "closed when the water reached the top of its arches.\n\n"
        "In summer children swim below the weir, and anglers line the banks from dawn."
    ),
    "list continuation": (
        "Here is a list of the planets with their order from the sun. Repeat the list exactly and add nothing:\n\n"
        "1. Mercury, the first planet\n2. Venus, the second planet\n3. Earth, the third planet\n"
        "4. Mars, the fourth planet\n5. Jupiter, the fifth planet\n6. Saturn, the sixth planet\n"
        "7. Uranus, the seventh planet\n8. Neptune, the eighth planet"
    ),
}

OPEN_ENDED = {
    "story": "Write a short story about a dragon who learns to paint.",
    "advice": "What are some good habits for staying focused while working from home?",
    "explanation": "Explain how a rainbow forms.",
    "poem": "Write a poem about the sea at night.",
    "plan": "Plan a relaxing weekend in the countryside.",
}
