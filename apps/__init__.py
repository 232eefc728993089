"""Chat apps over trained models: `lowrank chat` (terminal, chat.py) and `lowrank app` (Gradio, app.py).

Both sit on backends.py: one interface over a GGUF file run by llama.cpp
(gguf_backend.py) and a live adapter run by transformers + peft (hf_backend.py).
Nothing else in lowrank imports this package.
"""
