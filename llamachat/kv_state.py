"""One sequence's KV cache, copied out of a llama.cpp context as bytes and back in, and what such bytes depend on.

llama.cpp's llama_state_seq_get_data / llama_state_seq_set_data copy the cells of one sequence (positions, K and V
rows), not the whole context: no logits, no sampler, nothing of the other sequences. Llama.save_state() would also
copy llama-cpp-python's n_ctx-long token and logit arrays, many times the KV bytes of a short conversation.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path

import llama_cpp

from llamachat.model_file import read_record

# How much of each end of the model file goes into its fingerprint: the GGUF header and metadata (architecture,
# tokenizer, quantisation) at the start, the last tensors' bytes at the end. Hashing all 4 GB of Mistral would
# delay every start by tens of seconds; size + both ends + the download record's SHA-256 tell models apart.
_FINGERPRINT_SPAN = 4 << 20


def capture(ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t, seq_id: int, n_tokens: int) -> bytes:
    """The KV cells of seq_id at positions below n_tokens, as llama.cpp serialises them ('' when it has none)."""
    # Cells past n_tokens may be left by a decode that was aborted mid-batch: they are not the tokens we record.
    llama_cpp.llama_memory_seq_rm(memory, seq_id, n_tokens, -1)
    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buffer = bytearray(size)
    written = llama_cpp.llama_state_seq_get_data(ctx, (ctypes.c_uint8 * size).from_buffer(buffer), size, seq_id)
    return bytes(memoryview(buffer)[:written])


def restore(ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t, seq_id: int, data: bytes) -> bool:
    """Replaces what seq_id holds with the captured cells; False (the sequence left empty) if llama.cpp refuses them."""
    llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
    source = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))  # no copy: data outlives the call
    if llama_cpp.llama_state_seq_set_data(ctx, source, len(data), seq_id) == len(data):
        return True
    llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
    return False


def fingerprint(model_path: str | os.PathLike, llm: llama_cpp.Llama, n_ctx_seq: int, n_stream: int) -> str:
    """What captured bytes are valid for: this model file, this KV layout, this llama.cpp. Bytes captured under
    another fingerprint are never restored: a different model's or layout's cells would be garbage that still runs.

    n_ctx_seq: the tokens one sequence holds; n_stream: the context's KV streams (1, or the parallel sequences),
    which llama.cpp writes into the bytes and checks on reading.
    """
    path = Path(model_path)
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_SPAN))
        f.seek(max(0, size - _FINGERPRINT_SPAN))
        digest.update(f.read(_FINGERPRINT_SPAN))
    record = read_record(path)  # a download record, when there is one, names every byte
    params = llm.context_params
    description = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(llm.model, description, len(description))
    identity = {
        "model_size": size,
        "model_ends": digest.hexdigest(),
        "model_sha256": record.sha256 if record else None,
        "model": description.value.decode("utf-8", "replace"),
        "model_params": llama_cpp.llama_model_n_params(llm.model),
        "n_ctx_seq": n_ctx_seq,
        "n_stream": n_stream,
        "type_k": int(params.type_k),
        "type_v": int(params.type_v),
        "flash_attn": int(params.flash_attn_type),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp": llama_cpp.llama_print_system_info().decode("utf-8", "replace"),
    }
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=16).hexdigest()
