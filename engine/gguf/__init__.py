"""GGUF (llama.cpp's file format): read a file's model and tokenizer into the Hugging Face
layout the engine loads."""

from engine.gguf.convert import import_gguf
from engine.gguf.reader import GGUFError, GGUFFile
from engine.gguf.writer import export_gguf

__all__ = ["GGUFError", "GGUFFile", "export_gguf", "import_gguf"]
