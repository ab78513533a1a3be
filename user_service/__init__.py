"""UserService: creates and reads users."""
