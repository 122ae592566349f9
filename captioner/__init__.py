"""Client for the Qwen3-Omni Captioner service: audio in, caption out.

The public API, what test_client.py does as a library (bench/client_overhead.py uses it so):

    from captioner import BatchOptions, CaptionClient, ServerPool, StateFile, resolve_inputs, run_batch

    pool = ServerPool([CaptionClient("http://127.0.0.1:8003")])
    writer = StateFile(Path("out.jsonl"))  # or Output: stdout or a file in any format, in input order
    summary = run_batch(resolve_inputs(["clips/"]), BatchOptions(model="..."), pool, writer.write)

Each name loads its module on first use: `import captioner.options` (the command line's --help,
which test_client.py answers without the client's packages) stays standard library only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for mypy; at run time __getattr__ below loads them
    from captioner.api import Caption, CaptionClient
    from captioner.batch import BatchOptions, Summary, run_batch
    from captioner.errors import CaptionerError, ExitCode
    from captioner.inputs import InputItem, resolve_inputs
    from captioner.output import Output, ResumeInfo, StateFile
    from captioner.records import Record, Segment
    from captioner.servers import ServerPool

__version__ = "0.1.0"

__all__ = [
    "BatchOptions",
    "Caption",
    "CaptionClient",
    "CaptionerError",
    "ExitCode",
    "InputItem",
    "Output",
    "Record",
    "ResumeInfo",
    "Segment",
    "ServerPool",
    "StateFile",
    "Summary",
    "__version__",
    "resolve_inputs",
    "run_batch",
]
_MODULES = ("api", "batch", "errors", "inputs", "output", "records", "servers")  # the imports above


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _MODULES:
            value = getattr(importlib.import_module(f"captioner.{module}"), name, None)
            if value is not None:
                globals()[name] = value
                return value
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
