"""Framework-native entry points built on the core (torch autograd operation, JAX
``custom_jvp``, fused CuPy routines). Each adapter imports its framework; this package
imports none of them.
"""
