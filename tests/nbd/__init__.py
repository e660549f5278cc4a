"""Tests of the sans-IO NBD machines (``nbdproto``): a client joined to a server in memory.

This directory is a package so that its module names (``helpers``, ``test_properties``...)
cannot collide with other test directories'; imports inside it are relative.
"""
