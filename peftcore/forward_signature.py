"""``PeftModel.forward`` reports the *base* model's signature, for every task type.

Why: transformers' ``Trainer`` (``remove_unused_columns=True``, its default) keeps only the dataset
columns that ``inspect.signature(model.forward)`` names, and it unwraps only ``peft.PeftModel``
to look at the base model. A wrapper whose forward is ``(*args, **kwargs)`` (PEFT's ``PeftModel``
without a ``task_type``) makes it drop every column; the task classes' explicit parameter lists
would drop the base model's other inputs (``token_type_ids``, ``position_ids``, ``pixel_values``...).

How: ``forward`` on ``PeftModel`` and its subclasses is a descriptor returning a bound callable
whose ``__signature__`` is the base model's forward signature, read at each inspection (so it
follows the model actually wrapped). Calling it is calling the method itself: arguments are passed
on unchanged, so positional arguments keep the meaning PEFT's forward gives them; every keyword the
signature names is accepted because the task forwards pass unknown keywords on to the base model.
``__func__``/``__self__`` are there like on a bound method (accelerate's mixed precision wraps
``model.forward.__func__``).
"""

from __future__ import annotations

import functools
import inspect


class BaseModelSignatureForward:
    """Class attribute ``forward``: ``instance.forward`` is a :class:`SignedForward`."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, model, owner=None):
        if model is None:
            return self.func  # PeftModel.forward: the plain function, as for any method
        return SignedForward(self.func, model)


class SignedForward:
    """``model.forward`` of a peftcore ``PeftModel``: a bound method with the base model's signature."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, func, model):
        self.__func__ = func
        self.__self__ = model

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.__self__.get_base_model().forward)

    def __getattr__(self, name: str):
        return getattr(self.__func__, name)  # __name__, __qualname__, __doc__, __module__

    def __eq__(self, other) -> bool:  # like bound methods: same function on the same object
        return isinstance(other, SignedForward) and self.__func__ is other.__func__ and self.__self__ is other.__self__

    def __hash__(self) -> int:
        return hash((self.__func__, id(self.__self__)))

    def __repr__(self) -> str:
        return f"<bound method {self.__func__.__qualname__} of {type(self.__self__).__name__}>"


def sign_forward(cls: type) -> None:
    """Wrap the ``forward`` that ``cls`` defines itself (called from ``PeftModel.__init_subclass__``)."""
    forward = cls.__dict__.get("forward")
    if inspect.isfunction(forward):
        cls.forward = BaseModelSignatureForward(forward)
