"""Fitting a conversation into the model's context: the oldest whole turns go first, never the system prompt or
the new prompt, and room is kept for the reply."""
from dataclasses import dataclass
from typing import Dict, List

from chat_request import ChatError, ChatRequest
from llama_chat import LlamaChat

# With max_tokens 0 ("until the model stops") the reply still needs room: this much, or a quarter of the context.
MIN_REPLY_ROOM = 512


@dataclass
class FittedChat:
    history: List[Dict[str, str]]
    prompt_tokens: List[int]
    dropped_turns: int


def reply_room(request: ChatRequest, n_ctx: int) -> int:
    return request.max_tokens if request.max_tokens > 0 else min(MIN_REPLY_ROOM, n_ctx // 4)


def fit_to_context(chat: LlamaChat, request: ChatRequest) -> FittedChat:
    room = reply_room(request, chat.n_ctx)
    history, dropped = request.history, 0
    while True:
        try:
            tokens = chat.tokenize_messages(chat.messages(request.prompt, request.system_prompt, history))
        except Exception as ex:  # the template's own checks, e.g. roles that must alternate
            raise ChatError(f"The model's chat template rejected the conversation: {ex}") from None
        if len(tokens) + room <= chat.n_ctx:
            return FittedChat(history, tokens, dropped)
        if not history:
            raise ChatError(
                f"The prompt does not fit the model's context: it takes {len(tokens)} tokens (system prompt included) "
                f"and the reply needs {room} more ({'max_tokens' if request.max_tokens else 'the minimum kept for a reply'}), "
                f"but the context holds {chat.n_ctx}. Shorten the prompt"
                + (" or lower max_tokens." if request.max_tokens else ".")
            )
        # A turn is a user message and the assistant replies that follow it.
        end = 1
        while end < len(history) and history[end]["role"] == "assistant":
            end += 1
        history, dropped = history[end:], dropped + 1
