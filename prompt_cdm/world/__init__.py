"""The embedded default world: procedural shapes, captions, TIFA questions, the judge."""
from .captions import describe
from .dataset import Example, example, examples, read_imagefolder, render_domain, write_imagefolder
from .domains import DOMAINS, SOURCE_DOMAINS, Domain, get_domain, sample_spec
from .questions import answer_program, questions_for
from .render import render
from .spec import ObjectSpec, Spec

__all__ = [
    "DOMAINS", "SOURCE_DOMAINS", "Domain", "Example", "ObjectSpec", "Spec", "answer_program", "describe",
    "example", "examples", "get_domain", "questions_for", "read_imagefolder", "render", "render_domain",
    "sample_spec", "write_imagefolder",
]
