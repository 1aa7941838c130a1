"""An httpx client that counts what an SDK sends."""

from __future__ import annotations

import httpx
import openai

from tests.integration.conftest import LiveServer


class CountedHttp:
    """An httpx client for the SDKs that counts the requests they send: a client that quietly retried
    a bad answer (instructor's validation retries, LangChain's fallbacks) would pass on the second try."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.client = httpx.Client(timeout=120, event_hooks={"request": [self.requests.append]})

    def openai_client(self, server: LiveServer) -> openai.OpenAI:
        return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, http_client=self.client)
