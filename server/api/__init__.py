"""The HTTP edge: typed app state and its dependencies, middleware, and one router per resource."""
