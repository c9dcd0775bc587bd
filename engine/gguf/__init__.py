"""GGUF (llama.cpp's file format): read a file's model and tokenizer into the Hugging Face
layout the engine loads."""

from engine.gguf.convert import import_gguf
from engine.gguf.reader import GGUFError, GGUFFile

__all__ = ["GGUFError", "GGUFFile", "import_gguf"]
