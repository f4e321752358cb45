"""Constrained types for explainer and metric parameters.

Constructors annotate their parameters with these (or a `Literal[...]` of the legal choices),
and the registry (pipeline/registry.py) checks every argument against its annotation: on the
driver when a job spec is validated, and again when the class is built. So a constructor holds
no value checks of its own, only the ones that relate parameters to each other or to the model.

Bounds follow each parameter's meaning (METHODS.md); a float type accepts ints (3 is 3.0) but
not booleans or text. The plain `PositiveFloat` / `NonNegativeFloat` let infinity through where
it can mean "no limit"; the `Finite...` ones do not.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]

PositiveFloat = Annotated[float, Field(gt=0)]
FinitePositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
FiniteNonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]

UnitInterval = Annotated[float, Field(ge=0, le=1)]  # [0, 1]: a fraction, a share, an IoU
OpenUnitInterval = Annotated[float, Field(gt=0, lt=1)]  # (0, 1)

# a value in pixel space, before normalisation: 0 is black, 1 white (fills, baselines)
PixelValue = UnitInterval

# the explained quantity: the target's logit or its class score, by the model's score function
# (softmax; sigmoid for multi-label models) (METHODS.md)
Score = Literal["logit", "prob"]
