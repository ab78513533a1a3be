"""OrderService: creates orders, reads them and moves them through their statuses."""
