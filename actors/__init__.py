"""moot.actors: participants, the coordinator, tool loops, model providers, tools, the CLI.

Everything public is exported here; the modules behind it are private.
"""

from __future__ import annotations

import logging

from ._agents import Agent, AgentMemory, AgentReply, CallableAgent, LlmAgent, Payload
from ._anthropic import AnthropicProvider
from ._context import TALK_STYLES, TalkStyle, render_context
from ._decide import history_for_joiner, mentioned, should_react, speaking_order
from ._dialogue import Dialogue, Input, Participant, new_stream_id
from ._errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConnectionLostError,
    DialogueError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    ProviderError,
    ProviderTimeout,
    RateLimitError,
    ScriptError,
    ServerError,
    ToolError,
    ToolLoopError,
    error_record,
)
from ._http import RetryPolicy
from ._model import (
    Assembler,
    Delta,
    Finished,
    ModelRequest,
    ModelResponse,
    Provider,
    ReasoningDelta,
    TextDelta,
    ToolCallComplete,
    ToolCallDelta,
    ToolCallStart,
    UsageDelta,
    call_model,
)
from ._openai import OpenAIProvider
from ._scenario import Scenario, load_scenario, resume_dialogue, run_dialogue
from ._scripted import ScriptedCall, ScriptedProvider, ScriptedReply
from ._session import Session, TurnReply
from ._tools import (
    Tool,
    ToolContext,
    ToolOutcome,
    ToolRegistry,
    ToolRetry,
    execute,
    load_tool,
    tool,
)

logging.getLogger("moot").addHandler(logging.NullHandler())

__all__ = [
    "TALK_STYLES",
    "Agent",
    "AgentMemory",
    "AnthropicProvider",
    "AgentReply",
    "Assembler",
    "AuthenticationError",
    "BadRequestError",
    "CallableAgent",
    "ConfigurationError",
    "ConnectionLostError",
    "Delta",
    "Dialogue",
    "DialogueError",
    "Finished",
    "Input",
    "LlmAgent",
    "MalformedResponseError",
    "ModelRequest",
    "ModelResponse",
    "NotFoundError",
    "OpenAIProvider",
    "Participant",
    "Payload",
    "PermissionDeniedError",
    "Provider",
    "ProviderError",
    "ProviderTimeout",
    "RateLimitError",
    "ReasoningDelta",
    "RetryPolicy",
    "Scenario",
    "ScriptError",
    "ScriptedCall",
    "ScriptedProvider",
    "ScriptedReply",
    "ServerError",
    "Session",
    "TalkStyle",
    "TextDelta",
    "Tool",
    "ToolCallComplete",
    "ToolCallDelta",
    "ToolCallStart",
    "ToolContext",
    "ToolError",
    "ToolLoopError",
    "ToolOutcome",
    "ToolRegistry",
    "ToolRetry",
    "TurnReply",
    "UsageDelta",
    "call_model",
    "error_record",
    "execute",
    "history_for_joiner",
    "load_scenario",
    "load_tool",
    "mentioned",
    "new_stream_id",
    "render_context",
    "resume_dialogue",
    "run_dialogue",
    "should_react",
    "speaking_order",
    "tool",
]
