"""What the module answers about a chat, by its state in the chat queue: the acknowledgement of a new chat and the
answers of get_command_status and cancel_command (docs/protocol.md §2.2). Fields and messages are the SDK's own for a
long process, which clients of the original module know, plus the queued state. An answer names its own chat only.
"""

from __future__ import annotations

from typing import Callable

from codeproject_ai_sdk import JSON

from llamachat.chat_job import StopReason
from llamachat.chat_queue import ChatQueue, ChatState, QueuedChat

# The commandStatus of an answer about no chat this module holds (the SDK's word for it).
UNKNOWN = "unknown"
# The field that marks a chat refused because the queue is full, for programs (the OpenAI layer answers 429).
QUEUE_FULL_FIELD = "queue_full"


def acknowledgement(queue: ChatQueue, chat: QueuedChat) -> JSON:
    """The answer to a chat just queued."""
    position, wait = queue.place(chat)
    if position:
        return {"success": True, "commandId": chat.command_id, **_queued(position, wait)}
    return {
        "success": True,
        "message": "Command is running in the background",
        "commandId": chat.command_id,
        "commandStatus": ChatState.RUNNING,
    }


def queue_full(queue: ChatQueue) -> JSON:
    return {
        "success": False,
        QUEUE_FULL_FIELD: True,
        "error": f"The chat queue is full: the model is busy and at most {queue.capacity} chats may wait "
        "(CPAI_MODULE_LLAMA_QUEUE_SIZE); try again when one has finished",
    }


def find(queue: ChatQueue | None, command_id: str | None) -> QueuedChat | JSON:
    """The chat `command_id` names, or the error answer for a missing or unknown one."""
    if not command_id:
        return {"success": False, "commandStatus": UNKNOWN, "error": "No command ID provided"}
    chat = queue.get(command_id) if queue else None
    if chat is not None:
        return chat
    kept = f" ({queue.result_ttl} s, CPAI_MODULE_LLAMA_RESULT_TTL)" if queue else ""
    return {
        "success": False,
        "commandStatus": UNKNOWN,
        "error": "No chat has this commandId: it is not one this module gave out since it started, or the chat "
        f"ended longer ago than results are kept{kept}",
    }


def status(queue: ChatQueue, chat: QueuedChat) -> JSON:
    """get_command_status: a finished chat's result, a waiting one's place, a running one's reply so far."""
    answer = {"success": True, "commandId": chat.command_id}
    position, wait = queue.place(chat)  # first: a chat that has left the queue since has a result or runs
    if chat.result is not None:  # as the SDK's for a finished long process; the result may set success and error
        return {
            **answer,
            "message": "Command has completed",
            "commandStatus": ChatState.COMPLETED,
            "error": None,
            **chat.result,
        }
    if position:  # "reply": the original Explorer shows it while it polls
        return {**answer, **_queued(position, wait), "reply": ""}
    job = chat.job
    live = job.status() if job is not None else {"reply": ""}  # no job yet: a worker is about to start it
    return {
        **answer,
        "message": "The long running command is still in progress",
        "commandStatus": ChatState.RUNNING,
        **live,
    }


def cancel(queue: ChatQueue, chat: QueuedChat, cancelled_result: Callable[[QueuedChat], JSON]) -> JSON:
    """cancel_command: a waiting chat leaves the queue, a running one stops; a finished one stays readable (a Stop that
    crossed the end of the reply)."""
    state: ChatState | StopReason
    if chat.result is not None:
        message, state = "The chat had already finished; nothing to cancel", ChatState.COMPLETED
    else:
        queue.cancel(chat.command_id, cancelled_result)
        message, state = "The command has been cancelled", StopReason.CANCELLED
    return {"success": True, "message": message, "commandId": chat.command_id, "commandStatus": state}


def _queued(position: int, wait: float | None) -> JSON:
    return {
        "message": f"The chat is waiting for the model: number {position} in the queue",
        "commandStatus": ChatState.QUEUED,
        "queue_position": position,
        "estimated_wait_s": None if wait is None else round(wait, 1),
    }
