"""CPU_TURN: heavy work from many threads takes turns in arrival order, re-entrantly."""
import threading
import time

from anomaly.compute import FairTurn


def test_turns_are_granted_in_arrival_order_even_to_a_thread_that_comes_back_at_once():
    turn, order = FairTurn(), []
    holding = threading.Event()

    def looper():               # like a training loop: release and re-acquire at once
        for _ in range(3):
            with turn:
                order.append("loop")
                holding.set()
                time.sleep(0.05)

    def visitor(name):
        with turn:
            order.append(name)

    loop = threading.Thread(target=looper)
    loop.start()
    holding.wait(5)
    visitors = [threading.Thread(target=visitor, args=(f"visitor {i}",)) for i in range(2)]
    for v in visitors:
        v.start()
        time.sleep(0.01)        # arrive in this order, during the loop's first turn
    for t in (loop, *visitors):
        t.join(5)
    assert order == ["loop", "visitor 0", "visitor 1", "loop", "loop"]


def test_a_thread_can_take_its_turn_again_inside_its_turn():
    turn, other_ran = FairTurn(), []
    with turn:
        with turn:
            other = threading.Thread(target=lambda: turn.__enter__() and other_ran.append(True))
            other.start()
            other.join(0.2)
            assert not other_ran            # still ours
        other.join(0.2)
        assert not other_ran                # the outer turn is still ours
    other.join(5)
    assert other_ran
