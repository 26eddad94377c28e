"""The composition root: the `relais` command, which knows the three services by name and wires them to shared/.

`shared/` never imports from here nor from `services/`; this package may import both.
"""
