"""The protocol edge of atelier-mcp: the MCP server app, transports, CLI, config,
sandbox, structured logging, media delivery and jobs. No model or tensor math
lives here; tools (`tools/`) and the engine (`engine/`) do the work.
"""

__version__ = "0.1.0"
