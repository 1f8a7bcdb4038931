"""SynapticLlamas: a shell for llama.cpp distributed inference that pushes its events to Redis."""
__version__ = "0.1.0"
APP_NAME = "synapticllamas"
