"""The DreamBooth evaluation prompts (Ruiz et al. 2023, and github.com/google/dreambooth's dataset README).

Per subject the protocol generates 4 images for each of 25 prompts; the list depends on whether the subject
is an object or a live subject (a dog, a cat). In the templates `{0}` is the identifier and `{1}` the class
noun. PRES (language drift) uses the plain class prompt `a {1}`.
"""

from __future__ import annotations

_SHARED_SCENES = [
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
]

_SHARED_PROPERTIES = [
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
]

OBJECT_TEMPLATES = _SHARED_SCENES + [
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
] + _SHARED_PROPERTIES

LIVE_TEMPLATES = _SHARED_SCENES + [
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
] + _SHARED_PROPERTIES

PRES_TEMPLATE = "a {1}"


def _fill(template: str, identifier: str, class_noun: str) -> str:
    # An empty identifier gives the class-only text CLIP-T compares with; squash the double space it leaves.
    return " ".join(template.format(identifier, class_noun).split())


def eval_prompts(identifier: str, class_noun: str, live: bool = False) -> list[str]:
    """The 25 evaluation prompts for one subject, in the protocol's order (live=True for a dog, cat, ...)."""
    templates = LIVE_TEMPLATES if live else OBJECT_TEMPLATES
    return [_fill(t, identifier, class_noun) for t in templates]


def pres_prompt(class_noun: str) -> str:
    """The class prompt whose images PRES compares with the real subject: `a {class noun}`."""
    return _fill(PRES_TEMPLATE, "", class_noun)
