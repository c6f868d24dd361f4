"""Label Studio label configs, parsed in one place, and the one map between their labels and a model's classes.

The bridge writes each detection with the label its model class maps to; the trainer turns the
labels in annotations back into model classes through the same map, so a model trained on a
project keeps the class names the served model has, whatever the labels are called.

A label is stored in results under its ``alias`` when it has one, else its ``value``; Label
Studio finds a label by either. Per control:

- model class -> label (the bridge): the first ``<Label predicted_values="a,b">`` listing the
  class; else a label stored or valued as the class name; else the same ignoring case.
- label -> model class (the trainer): the class that maps to the label (its ``predicted_values``
  order first, then the model's); else, for a label no class maps to, the first of its
  ``predicted_values`` (a class the next model learns under that name); else the label itself.

So a region the bridge writes for class X, kept by an annotator, trains class X again.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from core.errors import ConfigError

__all__ = [
    "IMAGE",
    "RECTANGLE_LABELS",
    "ConfigControl",
    "ConfigLabel",
    "ConfigObject",
    "LabelConfig",
    "LabelMap",
    "map_labels",
    "parse_label_config",
]

logger = logging.getLogger(__name__)

RECTANGLE_LABELS = "RectangleLabels"
IMAGE = "Image"

# Label Studio's own rules (label-studio-sdk's label_interface): tags that hold labels, and a tag with
# name/toName that is no control.
_LABEL_TAGS = frozenset({"Label", "Choice", "Relation"})
_NOT_CONTROL_TAGS = frozenset({"Filter"})
# A DTD may declare entities that expand to gigabytes ("billion laughs"); no label config needs one.
_DECLARATION = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


@dataclass(frozen=True)
class ConfigLabel:
    """One ``<Label>`` of a control: its value, alias and attributes (``predicted_values``, ...)."""

    value: str
    alias: str | None
    attrs: Mapping[str, str]

    @property
    def name(self) -> str:
        """The name results store: the alias when there is one, else the value."""
        return self.alias or self.value

    @property
    def predicted_values(self) -> tuple[str, ...]:
        """The model classes this label shows, as listed (comma-separated in the config)."""
        raw = str(self.attrs.get("predicted_values", ""))
        return tuple(dict.fromkeys(v.strip() for v in raw.split(",") if v.strip()))


@dataclass(frozen=True)
class ConfigObject:
    """An object tag (``<Image name="image" value="$image"/>``)."""

    tag: str
    name: str
    value: str

    @property
    def value_key(self) -> str | None:
        """The task ``data`` key the object reads (``$image`` -> ``image``); None for a literal value."""
        if self.value.startswith("$") and len(self.value) > 1 and not any(c in self.value for c in ", "):
            return self.value[1:]
        return None


@dataclass(frozen=True)
class ConfigControl:
    """A control tag with its labels and the object tags it points at (those that exist)."""

    tag: str
    name: str
    to_names: tuple[str, ...]
    attrs: Mapping[str, str]
    labels: tuple[ConfigLabel, ...]
    objects: tuple[ConfigObject, ...]


@dataclass(frozen=True)
class LabelConfig:
    """A parsed label config: its controls and objects, in config order."""

    controls: tuple[ConfigControl, ...]
    objects: tuple[ConfigObject, ...]

    def controls_of(self, tags: Collection[str]) -> tuple[ConfigControl, ...]:
        """The controls with one of these tag names (``RectangleLabels``)."""
        return tuple(c for c in self.controls if c.tag in tags)

    def describe(self) -> str:
        """The controls and their targets, for error messages."""
        return "; ".join(f"{c.tag} {c.name!r} -> {', '.join(c.to_names)}" for c in self.controls) or "no controls"


def _control_for(
    element: ET.Element, parents: Mapping[ET.Element, ET.Element], controls: Mapping[ET.Element, str]
) -> str | None:
    """The name of a ``<Label>``'s nearest enclosing control (labels may sit in nested ``<View>``s)."""
    parent = parents.get(element)
    while parent is not None:
        if parent in controls:
            return controls[parent]
        parent = parents.get(parent)
    return None


def _is_control(element: ET.Element) -> bool:
    return bool(element.get("name") and element.get("toName")) and element.tag not in _NOT_CONTROL_TAGS


def _is_object(element: ET.Element) -> bool:
    return bool(element.get("name") and (element.get("value") or element.get("valueList")))


def _parse_xml(config: str) -> ET.Element:
    """The config's root element; a DOCTYPE is refused (entity expansion), bad XML is a ConfigError."""
    if _DECLARATION.search(config):
        raise ConfigError("label config cannot be parsed: DOCTYPE and ENTITY declarations are not allowed")
    try:
        return ET.fromstring(config)
    except ET.ParseError as exc:
        raise ConfigError(f"label config cannot be parsed: {exc}") from exc


@lru_cache(maxsize=64)
def parse_label_config(config: str) -> LabelConfig:
    """Controls, labels and objects as Label Studio reads them; ConfigError when the XML does not parse.

    As in Label Studio: a control is any tag with ``name`` and ``toName`` (but ``Filter``), an
    object any other tag with ``name`` and ``value`` (or ``valueList``), and a ``<Label>`` (or
    ``Choice``, ``Relation``) belongs to its nearest enclosing control. A later tag with the same
    name replaces an earlier one, as does a label stored under the same name in one control.
    """
    root = _parse_xml(config)
    parents = {child: parent for parent in root.iter() for child in parent}
    controls: dict[str, ET.Element] = {}
    names: dict[ET.Element, str] = {}
    labels: dict[str, dict[str, ConfigLabel]] = {}
    objects: dict[str, ConfigObject] = {}
    for element in root.iter():
        attrs = dict(element.attrib)
        if _is_control(element):
            controls[attrs["name"]] = element
            names[element] = attrs["name"]
        elif _is_object(element):
            value = attrs.get("valueList", attrs.get("value", ""))
            objects[attrs["name"]] = ConfigObject(tag=str(element.tag), name=attrs["name"], value=value)
        elif element.tag in _LABEL_TAGS:
            owner = _control_for(element, parents, names)
            stored = attrs.get("alias") or attrs.get("value")
            if owner is not None and stored:
                alias = attrs.get("alias") or None
                labels.setdefault(owner, {})[stored] = ConfigLabel(attrs.get("value", stored), alias, attrs)
    parsed = []
    for name, element in controls.items():
        to_names = tuple(str(element.get("toName")).split(","))
        parsed.append(
            ConfigControl(
                tag=str(element.tag),
                name=name,
                to_names=to_names,
                attrs=dict(element.attrib),
                labels=tuple(labels.get(name, {}).values()),
                objects=tuple(objects[n] for n in to_names if n in objects),
            )
        )
    return LabelConfig(controls=tuple(parsed), objects=tuple(objects.values()))


@dataclass(frozen=True)
class LabelMap:
    """One control's labels and a model's classes, both ways (see the module docstring)."""

    control: str
    to_label: Mapping[str, str]
    to_class: Mapping[str, str]
    classes: tuple[str, ...]
    unlabelled: tuple[str, ...] = ()
    unknown_predicted: tuple[tuple[str, str], ...] = ()

    def label_for(self, model_class: str) -> str | None:
        """The label a model class is written with; None when no label shows it."""
        return self.to_label.get(model_class)

    def class_for(self, label: str) -> str:
        """The model class an annotated label trains; a label the control does not list stays as it is."""
        return self.to_class.get(label, label)


def _class_for_label(label: ConfigLabel, to_label: Mapping[str, str], model_classes: Sequence[str]) -> str:
    mapped = [c for c in model_classes if to_label.get(c) == label.name]
    for value in label.predicted_values:
        if value in mapped:
            return value
    if mapped:
        return mapped[0]
    if label.predicted_values:
        return label.predicted_values[0]
    return label.name


def map_labels(control: ConfigControl, model_classes: Iterable[str]) -> LabelMap:
    """The map between one control's labels and ``model_classes`` (empty when no model is served yet)."""
    classes = list(dict.fromkeys(model_classes))
    known = set(classes)
    to_label: dict[str, str] = {}
    unknown: list[tuple[str, str]] = []
    for label in control.labels:
        for value in label.predicted_values:
            if value in known:
                to_label.setdefault(value, label.name)
            else:
                unknown.append((label.name, value))
    exact: dict[str, str] = {}
    folded: dict[str, str] = {}
    # stored names before values, so a label's alias never loses to another label's value
    keyed = [(label.name, label.name) for label in control.labels]
    keyed += [(label.value, label.name) for label in control.labels]
    for key, label_name in keyed:
        exact.setdefault(key, label_name)
        folded.setdefault(key.casefold(), label_name)
    unlabelled = []
    for name in classes:
        if name in to_label:
            continue
        found = exact.get(name) or folded.get(name.casefold())
        if found is None:
            unlabelled.append(name)
        else:
            to_label[name] = found
    to_class: dict[str, str] = {}
    for label in control.labels:
        model_class = _class_for_label(label, to_label, classes)
        to_class.setdefault(label.name, model_class)
        to_class.setdefault(label.value, model_class)
    return LabelMap(
        control=control.name,
        to_label=to_label,
        to_class=to_class,
        classes=tuple(dict.fromkeys(to_class[label.name] for label in control.labels)),
        unlabelled=tuple(unlabelled),
        unknown_predicted=tuple(unknown),
    )
