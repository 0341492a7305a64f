"""Model cards: a registered version documented from recorded facts only
(:func:`build_card`), rendered as Markdown or self-contained HTML (:mod:`mloop.cards.render`).
"""

from mloop.cards.model_card import build_card

__all__ = ["build_card"]
