"""What a request needs beyond HTTP: served models, their registry and lifecycle, generation.

Kept empty on purpose: importing one module of the package must not import the others (and
torch with them).
"""
