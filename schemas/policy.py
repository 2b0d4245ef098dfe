"""Which teacher endpoints a job may talk to: the authorised-use policy, checked at load time.

teacher-harvest is for distilling models you own or are licensed to distil. So:
- endpoints on loopback, private address ranges and cluster-internal names (no dot, or a
  ``.local`` / ``.internal`` / ``.svc`` / ``.cluster.local`` suffix) are allowed;
- any other host must be listed in ``teacher.authorization.allowed_hosts``;
- well-known hosted LLM API providers are refused even when listed, unless the authorisation
  names an agreement with that provider (``provider_agreement``), which every shard records.
The check runs while the spec is validated, so a refused job never opens a connection.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

# Hosted LLM APIs whose terms restrict using outputs to train other models. A suffix match.
HOSTED_PROVIDERS = (
    "api.openai.com",
    "openai.azure.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "api.mistral.ai",
    "api.cohere.ai",
    "api.cohere.com",
    "api.together.xyz",
    "api.groq.com",
    "api.deepseek.com",
    "api.x.ai",
    "openrouter.ai",
    "api.fireworks.ai",
    "api.perplexity.ai",
    "amazonaws.com",
    "api-inference.huggingface.co",
    "router.huggingface.co",
    "api.replicate.com",
    "dashscope.aliyuncs.com",
    "api.moonshot.cn",
    "open.bigmodel.cn",
)
INTERNAL_SUFFIXES = (".local", ".internal", ".svc", ".cluster.local", ".localdomain")


def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower().rstrip(".")


def is_internal(host: str) -> bool:
    """Loopback, private or link-local addresses, and names that only resolve inside a cluster."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost" or "." not in host or host.endswith(INTERNAL_SUFFIXES)
    return ip.is_loopback or ip.is_private or ip.is_link_local


def hosted_provider(host: str) -> str | None:
    for domain in HOSTED_PROVIDERS:
        if host == domain or host.endswith("." + domain):
            return domain
    return None


def endpoint_problems(
    endpoints: list[str], allowed_hosts: list[str], provider_agreement: str | None
) -> list[str]:
    """Why each endpoint is refused; empty when the job may use them all."""
    allowed = {h.lower().rstrip(".") for h in allowed_hosts}
    problems = []
    for url in endpoints:
        host = host_of(url)
        provider = hosted_provider(host)
        if provider and not provider_agreement:
            problems.append(
                f"{host} is a hosted LLM API ({provider}) whose terms restrict training on its "
                "outputs; teacher-harvest refuses it unless teacher.authorization."
                "provider_agreement names your agreement with that provider"
            )
        elif not provider and not is_internal(host) and host not in allowed:
            problems.append(
                f"{host} is not loopback, private or cluster-internal; list it in "
                "teacher.authorization.allowed_hosts if you own or are licensed to use it"
            )
    return problems
