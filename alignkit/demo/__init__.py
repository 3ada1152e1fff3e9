"""The embedded demo: data alignkit generates itself, around a task a program can score."""
