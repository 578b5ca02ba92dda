"""The analyses of the thesis on top of the engine: Chapter 3 measures, FQ, TIP, GMM, masking,
the Captum-style attribution classes and the thesis tables."""
