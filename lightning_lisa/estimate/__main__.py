"""``python -m lightning_lisa.estimate MODEL``: print the memory estimate of a model."""

from lightning_lisa.estimate.api import main

raise SystemExit(main())
