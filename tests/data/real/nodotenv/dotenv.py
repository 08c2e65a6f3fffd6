"""A no-op stand-in for python-dotenv, put on PYTHONPATH for the vendored mcp_pipe.py only when
python-dotenv is not installed (it is not in the [test] extra). Not vendored: written for this
project (MIT, as the rest of it). The tests pass MCP_ENDPOINT and MCP_CONFIG in the environment,
so there is no .env file to load."""


def load_dotenv(*args: object, **kwargs: object) -> bool:
    return False
