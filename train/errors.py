"""The one error type for bad configuration: names the dotted key and says how to fix it."""


class ConfigError(ValueError):
    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config error: {key} {problem}")
