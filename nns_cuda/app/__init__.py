"""The application: the ``nns`` command line, the demo, the HTML report and its figures."""
