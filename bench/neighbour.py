"""A second llama.cpp process that generates without pause, as another AI module on the same machine would:
`python -m bench.neighbour MODEL THREADS`. It prints READY once the model is loaded, then runs until killed."""

import sys

from llama_cpp import Llama

from .workload import GENERATION_PROMPT, N_CTX, SAMPLING, chat_messages

READY = "READY"


def main(model: str, threads: int) -> None:
    llm = Llama(model_path=model, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
    print(READY, flush=True)
    while True:
        llm.reset()
        for _ in llm.create_chat_completion(
            messages=chat_messages(GENERATION_PROMPT), stream=True, max_tokens=256, **SAMPLING
        ):
            pass


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
