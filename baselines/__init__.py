"""The rival selection methods, one file each (a plug-in package: it imports only the core).

Every public module here is imported by the method registry (entry-point group ``bench_suite.methods``)
and registers its ``Selector`` subclass with ``@register``; modules starting with ``_`` are shared
machinery: ``_labelfree`` (tiled similarity kernels, spherical k-means), ``_al_protocol`` (the paper's
active-learning rounds), ``_al_head`` (the task model), ``_al_images`` and ``_al_vae`` (VAAL's inputs and
models).
"""
