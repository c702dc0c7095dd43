"""The application around the ``elastic`` training library: the ``elastic`` command line and the one
place that wires the trainer, the controller loop, the actuators and the live display together.

``elastic/`` never imports ``controller/``; this package imports both.
"""
