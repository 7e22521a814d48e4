"""The client side: async SDK (and sync wrapper), discovery, Worker."""
