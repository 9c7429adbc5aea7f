"""Hydra recipes: models, data, a LightningModule, a TensorBoard monitor and ``run(cfg)``.

``recipes/train.py`` (the ``@hydra.main`` entry point) only calls :func:`codedgrad.recipes.train.run`;
everything it builds lives here so that it can be tested without Hydra or torchrun. Nothing else in
the package imports this one; ``processes`` also serves ``recipes/demo.py`` and the tests'
launches (docs/design.md, "Layout": recipes only compose).
"""
