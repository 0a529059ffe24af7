"""Model loading: zoo, HF directories, GGUF files, artifacts; edgetk's own decoder and encoder."""
from .bert import BertConfig, BertEncoder
from .llama import DenseKVCache, LlamaConfig, LlamaForCausalLM
from .loading import ARTIFACT_LOADERS, LoadedModel, load, load_gguf, load_hf_dir
from .tokenizer import Tokenizer
from .zoo import ZOO, fetch, is_fetched

__all__ = ["BertConfig", "BertEncoder", "DenseKVCache", "LlamaConfig", "LlamaForCausalLM", "ARTIFACT_LOADERS",
           "LoadedModel", "load", "load_gguf", "load_hf_dir", "Tokenizer", "ZOO", "fetch", "is_fetched"]
