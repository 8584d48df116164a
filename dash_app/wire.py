"""Elements in Dash's wire format: the plain dicts (type, namespace, props) a component becomes in a response.

A search page has a dozen or more elements per result and 20 results. Built as component objects each costs a
constructor with prop validation and as much again to turn back into a dict for the response; built as dicts
they cost next to nothing, and Dash sends them unchanged (orjson writes the whole response in one call). Use these for repeated, hot parts of a page;
ordinary layouts stay `dash.html` / `dash.dcc` components (the two mix freely as children).
"""

from __future__ import annotations

from typing import Any

_HTML, _DCC = "dash_html_components", "dash_core_components"


def _element(namespace: str, tag: str, children: Any, props: dict[str, Any]) -> dict:
    if children is not None:
        props["children"] = children
    # Python-side names of reserved words, as dash.html takes them
    if "class_name" in props:
        props["className"] = props.pop("class_name")
    return {"type": tag, "namespace": namespace, "props": props}


def html(tag: str, children: Any = None, **props: Any) -> dict:
    """An html.<tag> element, e.g. html("Span", "text", className="muted")."""
    return _element(_HTML, tag, children, props)


def dcc(tag: str, children: Any = None, **props: Any) -> dict:
    """A dcc.<tag> element, e.g. dcc("Link", "go", href="/search")."""
    return _element(_DCC, tag, children, props)
