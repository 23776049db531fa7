"""Read models that follow the log. They never write events and never import gateways."""
