"""The one error type for bad configuration: names the dotted key and says how to fix it.

A leaf module with no imports, so every package (data, model, moe, parallel, train) may raise it.
"""


class ConfigError(ValueError):
    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config error: {key} {problem}")
