"""Pure core: splitting each meter interval's energy among the requests in it."""
