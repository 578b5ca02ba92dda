"""The application: the ``nns`` command line (:mod:`~nns_cuda.app.cli`, one module per command
in :mod:`~nns_cuda.app.commands`), the demo pipeline (:mod:`~nns_cuda.app.demo`), the HTML
report (:mod:`~nns_cuda.app.report`) and its figures (:mod:`~nns_cuda.app.viz`)."""
