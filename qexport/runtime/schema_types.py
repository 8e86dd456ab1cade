"""The building blocks of the build folder's file schemas (runtime.manifest_schema,
runtime.pipeline_schema): the bounds, a file name of the build (relative, inside the folder), and
the bounded scalar, shape and dtype types the models are made of."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, JsonValue, Strict
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

MAX_STEPS = 1000  # denoising steps, and so ranges
MAX_FILES = 10_000  # files of one build folder
MAX_PATH = 200  # characters of a file name relative to the build folder
MAX_NAME = 256  # characters of a tensor, layer, class or part name
MAX_TEXT = 65_536  # characters of a free-text entry
MAX_ENTRIES = 1 << 17  # vocabulary words, class names, layer ids
MAX_ELEMENTS = 1 << 26  # elements of one tensor the edge loop allocates (256 MiB of float32)
MAX_DIM = 1 << 20
MAX_COEF = 1e6  # |coefficient|: sampler weights, CFG scale, VAE factors
MAX_TIMESTEP = 1e7
MAX_BYTES = 1 << 45  # one file
PATH_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*$"
SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def path_problem(name: str) -> str | None:
    """Why `name` cannot name a file of a build folder (None: it can): it must be relative, without
    '..' or '.' segments, at most MAX_PATH characters of letters, digits, '_', '.', '+', '-' and '/'
    separators, no segment starting with '.' or '-'."""
    if not name:
        return "an empty file name"
    if len(name) > MAX_PATH:
        return f"a file name of {len(name)} characters, more than {MAX_PATH}"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path; a build names its files relative to its folder"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "a path with '..', which leaves the build folder"
    if not all(SEGMENT.match(p) for p in parts):
        return "a file name with characters other than letters, digits, '_', '.', '+', '-' and '/' separators"
    return None


class BuildFile(str):
    """A file of the build named in the manifest: relative to the build folder and inside it
    (path_problem); read_manifest also resolves it (no symlink out) and checks its digest."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(cls._check, core_schema.str_schema(strict=True))

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "maxLength": MAX_PATH, "pattern": PATH_PATTERN,
                "description": "a file of the build folder, relative to it"}  # fmt: skip

    @classmethod
    def _check(cls, value: str) -> BuildFile:
        if (why := path_problem(value)) is not None:
            raise PydanticCustomError("build_file", "{why}", {"why": why})
        return cls(value)


Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0, le=1 << 31)]
Index = Annotated[int, Field(ge=0, lt=MAX_STEPS)]
Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
Coef = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_COEF, le=MAX_COEF)]
Timestep = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_TIMESTEP, le=MAX_TIMESTEP)]


def _few_elements(shape: list[int]) -> list[int]:
    if math.prod(shape) > MAX_ELEMENTS:
        raise PydanticCustomError("too_large", "a tensor of {n} elements, more than {most}",
                                  {"n": math.prod(shape), "most": MAX_ELEMENTS})  # fmt: skip
    return shape


Shape = Annotated[list[Dim], Field(max_length=8), AfterValidator(_few_elements)]
DType = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]
Order = Literal["uncond,cond", "cond,uncond", "cond", "uncond"]
Term = Annotated[tuple[Index, Coef], Strict(False)]  # (step j, its coefficient): a JSON pair
Info = dict[str, JsonValue]  # an informational record, bounded by the file's size and nesting
