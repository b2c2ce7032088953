"""The module's engine: what llama_chat_adapter.py (the CodeProject.AI side) and fetch_model.py (the installer's
side) are built from. One flat package, one job per file; docs/architecture.md maps it."""
