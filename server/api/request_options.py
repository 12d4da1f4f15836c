"""What a request's method options need from the server, resolved in the preparing worker
thread: RAG retrieval, kNN-LM datastores (and their fingerprint check), logit rules, method
option checks, and what reward models and self-evaluators read. `OpenAIServing` mixes it in;
it touches the engine only through read-only peeks (adapters, config), as `check_model`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.store import StoreError
from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.tools import chat_messages
from server.engine.engine import RequestError
from server.engine.logit_rules import RuleError, bad_word_token_seqs, build_rules
from server.methods.dola import resolve_layers
from server.methods.rag import RAG

if TYPE_CHECKING:
    from server.api.serving import Prepared


class RequestOptions:
    """Mixin for OpenAIServing (needs .engine, .tokenizer, .retrieval, ._fingerprints)."""

    def _rag(self, body, query: str) -> RAG | None:
        """Retrieve for a `rag` request (blocking: we are in the preparing worker thread)."""
        if body.rag is None:
            return None
        if self.retrieval is None:
            raise APIError(400, "this server has no retrieval layer", "rag")
        rag = RAG(body.rag, self.retrieval)
        try:
            rag.retrieve(query)
        except StoreError as exc:
            raise APIError(exc.status, str(exc), f"rag.{exc.param}" if exc.param else "rag") from exc
        return rag

    def _knn_lm(self, body, prep: Prepared):
        """The request's kNN-LM method over its datastore, once the datastore is known to be
        built under the weights this request runs (404 unknown, 409 another model/adapter)."""
        from retrieval.datastore import adapter_fingerprint, model_fingerprint, tokenizer_fingerprint
        from server.methods.knn_lm import KNNLM

        if prep.method is not None:
            raise APIError(400, f"knn_lm and {prep.method.name} cannot be combined in one request yet", "knn_lm")
        if self.retrieval is None:
            raise APIError(400, "this server has no retrieval layer", "knn_lm")
        engine = self.engine.engine  # read-only peeks across threads, as check_model
        if self._fingerprints is None:
            self._fingerprints = (model_fingerprint(engine.runner.model), tokenizer_fingerprint(self.tokenizer))
        adapter = engine.adapters.get(prep.adapter) if prep.adapter else None
        try:
            store = self.retrieval.datastore(body.knn_lm.datastore)
            store.check_compatible(self._fingerprints[0], adapter_fingerprint(adapter.weights if adapter else None),
                                   self._fingerprints[1], prep.adapter)
        except StoreError as exc:
            raise APIError(exc.status, str(exc), "knn_lm.datastore") from exc
        return KNNLM(body.knn_lm, store)

    def _logit_rules(self, body: ChatCompletionRequest | CompletionRequest, params) -> tuple:
        engine = self.engine.engine
        try:
            return build_rules(logit_bias=body.logit_bias, min_tokens=body.min_tokens, max_tokens=params.max_tokens,
                               end_token_ids=set(engine.eos_token_ids) | set(params.stop_token_ids),
                               allowed_token_ids=body.allowed_token_ids, vocab_size=engine.model_config.vocab_size,
                               bad_words=bad_word_token_seqs(self.tokenizer, body.bad_words or ()))
        except RuleError as exc:
            raise APIError(400, str(exc), exc.param) from exc

    def check_methods(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        """Refuse bad method options before any response starts (a stream cannot change its
        status later). The engine thread checks again when it adds the request."""
        engine = self.engine.engine  # read-only peeks across threads, as check_model
        try:
            if body.reward_model is not None:
                engine.resolve_adapter(body.reward_model, role="rm", param="reward_model")
            if body.genarm is not None:
                engine.resolve_adapter(body.genarm.reward_model, param="genarm.reward_model")
            if body.search is not None:
                engine.resolve_adapter(body.search.reward_model, role="rm", param="search.reward_model")
            if body.rain is not None and body.rain.evaluator != "self":
                engine.resolve_adapter(body.rain.evaluator, role="rm", param="rain.evaluator")
        except RequestError as exc:
            raise APIError(exc.status, str(exc), exc.param) from exc
        if body.dola_layers is not None:
            config = engine.model_config
            try:
                resolve_layers(body.dola_layers, config.num_layers, config.tie_word_embeddings)
            except ValueError as exc:
                raise APIError(400, str(exc), "dola_layers") from exc

    # ---- response side -----------------------------------------------------------------

    @staticmethod
    def _question(prep: Prepared) -> str | None:
        """The last user turn of a chat (what a self-evaluator judges the reply to)."""
        if prep.kind != "chat":
            return None
        users = [m.text() for m in prep.body.messages if m.role == "user"]
        return users[-1] if users else None

    def _reward_renderer(self, prep: Prepared):
        """What a reward model scores for a reply: for chat, the template over the conversation
        plus the reply (as our trainer and TRL render RM data); None for completions. Tool
        turns are rendered as Hermes text (server/api/tools.py), which any template takes."""
        if prep.kind != "chat":
            return None
        messages = chat_messages(prep.body, native=False)
        return lambda reply: self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
