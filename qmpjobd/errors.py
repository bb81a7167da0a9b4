"""The one exception type every layer raises for errors a QMP client sees."""


class QMPError(Exception):
    """An error reply: ``{"error": {"class": error_class, "desc": desc}}``.

    ``error_class`` is one of QEMU's QapiErrorClass names (GenericError,
    CommandNotFound, DeviceNotActive, DeviceNotFound, KVMMissingCap).
    """

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def __repr__(self) -> str:
        return f"QMPError({self.desc!r}, {self.error_class!r})"
