"""zhllm data engine: raw corpora -> cleaned text -> tokenizer -> packed memmap token files -> datasets.

Data flows one way: ``engine.sources`` -> ``engine.clean`` -> ``engine.tokenizer`` -> ``engine.pack``
-> ``*.bin`` / ``*.idx.npy`` / ``*.meta.json`` -> ``engine.dataset``. Nothing here imports a model;
torch is imported only by ``engine.dataset``, at the edge, to hand out tensors.
"""

__version__ = "0.1.0"
