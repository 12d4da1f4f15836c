"""Retrieval: sentence embeddings, faiss indexes, document store and kNN-LM datastores."""
