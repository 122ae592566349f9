"""The kit's server side: what runs inside vLLM's API server, which start_service.sh loads with
`--middleware captioner_server.request_guard.RequestGuard` and the kit's root on PYTHONPATH.

request_guard (the middleware: what reaches vLLM), request_policy (what a caption request may be),
media_fetch (the fetch of an allowed audio URL), audio_api (the OpenAI audio upload, captioned
through the chat path), caption_page (the page at /), http_limits (the HTTP parser's header cap
and deadline). The client is the captioner package beside it.
"""
