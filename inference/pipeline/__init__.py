"""The one pipeline every front door calls: command + request JSON + instances in, a checked result out.

- ``handler_registry``: commands mapped to handler functions and their declared parameters.
- ``pipeline``: ``Pipeline.run`` looks the command up, checks the parameters and the instances,
  calls the handler with its context, checks the output against the protocol, logs and times it.
"""
