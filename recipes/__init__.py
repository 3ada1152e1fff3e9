"""The stage recipes, one module per stage, each a ``main(argv)`` around one :class:`alignkit.train.Run`.

They run as ``accelerate launch recipes/<stage>.py --config X.yaml`` from a checkout, and ship in the package as
``alignkit.recipes`` so that ``alignkit <stage> --config X.yaml`` runs the same ``main`` from a plain install."""
