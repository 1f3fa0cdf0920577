"""
A download's lifecycle, as an explicit state machine (Automat): which
stage it is in, and what each event does there.  The work is done by the
C{driver} (the L{Download}); this only decides what to do when.

    finding --found_manifest--> opening --opened--> fetching
    fetching --all_verified--> completing --completed--> finished
    any stage but completing --cancel / pause--> stopped
    finding, opening, fetching, completing --failures--> failed

Events that come late (a storage open that finishes after a cancel, a
second manifest) are taken and ignored in the stages where they no longer
mean anything, so the driver needs no flags to guard against them.
"""

from automat import MethodicalMachine


class Lifecycle:
    """
    The stage of one download.

    The driver provides: C{open_storage()}, C{start_fetching(verified)},
    C{complete()}, C{finished(result)}, C{failed(reason)} and
    C{stopped(cancelled)}.
    """

    _machine = MethodicalMachine()

    def __init__(self, driver):
        self._driver = driver

    # -- stages --------------------------------------------------------------------

    @_machine.state(initial=True)
    def finding(self):
        "Connecting to the peers that offer the file; no manifest yet."

    @_machine.state()
    def opening(self):
        "The manifest is in; the partial file is opened (and checked, on a resume)."

    @_machine.state()
    def fetching(self):
        "Asking sources for chunks, verifying and storing what arrives."

    @_machine.state()
    def completing(self):
        "Every chunk is verified: the file is made durable and linked into place."

    @_machine.state()
    def finished(self):
        "The file is in place under its name."

    @_machine.state()
    def failed(self):
        "It cannot go on; what was verified is kept for a resume."

    @_machine.state()
    def stopped(self):
        "Stopped by the user (cancelled: nothing kept) or by the peer (kept)."

    # -- events --------------------------------------------------------------------

    @_machine.input()
    def found_manifest(self):
        "A peer gave a manifest that matches the file id."

    @_machine.input()
    def no_manifest(self, reason):
        "No peer could give the manifest."

    @_machine.input()
    def opened(self, verified):
        "The partial file is open; C{verified} chunks were already in it."

    @_machine.input()
    def open_failed(self, reason):
        "The partial file could not be opened."

    @_machine.input()
    def all_verified(self):
        "The last chunk is verified and stored."

    @_machine.input()
    def stuck(self, reason):
        "No source is left that could give the missing chunks."

    @_machine.input()
    def write_failed(self, reason):
        "A chunk could not be stored."

    @_machine.input()
    def completed(self, result):
        "The file is in place: C{result} is C{(final name, signature)}."

    @_machine.input()
    def complete_failed(self, reason):
        "The file could not be made durable or put in place."

    @_machine.input()
    def cancel(self):
        "The user cancelled: stop, and throw the partial file away."

    @_machine.input()
    def pause(self):
        "The peer is stopping: stop, and keep the partial file."

    # -- what the driver does --------------------------------------------------------

    @_machine.output()
    def _open_storage(self):
        self._driver.open_storage()

    @_machine.output()
    def _start_fetching(self, verified):
        self._driver.start_fetching(verified)

    @_machine.output()
    def _complete(self):
        self._driver.complete()

    @_machine.output()
    def _finished(self, result):
        self._driver.finished(result)

    @_machine.output()
    def _failed(self, reason):
        self._driver.failed(reason)

    @_machine.output()
    def _cancelled(self):
        self._driver.stopped(cancelled=True)

    @_machine.output()
    def _paused(self):
        self._driver.stopped(cancelled=False)

    # -- transitions -------------------------------------------------------------------

    finding.upon(found_manifest, enter=opening, outputs=[_open_storage])
    finding.upon(no_manifest, enter=failed, outputs=[_failed])
    finding.upon(cancel, enter=stopped, outputs=[_cancelled])
    finding.upon(pause, enter=stopped, outputs=[_paused])

    opening.upon(found_manifest, enter=opening, outputs=[])
    opening.upon(opened, enter=fetching, outputs=[_start_fetching])
    opening.upon(open_failed, enter=failed, outputs=[_failed])
    opening.upon(cancel, enter=stopped, outputs=[_cancelled])
    opening.upon(pause, enter=stopped, outputs=[_paused])

    fetching.upon(found_manifest, enter=fetching, outputs=[])
    fetching.upon(all_verified, enter=completing, outputs=[_complete])
    fetching.upon(stuck, enter=failed, outputs=[_failed])
    fetching.upon(write_failed, enter=failed, outputs=[_failed])
    fetching.upon(cancel, enter=stopped, outputs=[_cancelled])
    fetching.upon(pause, enter=stopped, outputs=[_paused])

    # Completing takes a moment (an fsync and a link); a cancel or a stop then
    # comes too late to matter, and the file is finished all the same.
    completing.upon(found_manifest, enter=completing, outputs=[])
    completing.upon(all_verified, enter=completing, outputs=[])
    completing.upon(stuck, enter=completing, outputs=[])
    completing.upon(write_failed, enter=completing, outputs=[])
    completing.upon(completed, enter=finished, outputs=[_finished])
    completing.upon(complete_failed, enter=failed, outputs=[_failed])
    completing.upon(cancel, enter=completing, outputs=[])
    completing.upon(pause, enter=completing, outputs=[])

    for _over in (finished, failed, stopped):
        _over.upon(found_manifest, enter=_over, outputs=[])
        _over.upon(no_manifest, enter=_over, outputs=[])
        _over.upon(opened, enter=_over, outputs=[])
        _over.upon(open_failed, enter=_over, outputs=[])
        _over.upon(all_verified, enter=_over, outputs=[])
        _over.upon(stuck, enter=_over, outputs=[])
        _over.upon(write_failed, enter=_over, outputs=[])
        _over.upon(completed, enter=_over, outputs=[])
        _over.upon(complete_failed, enter=_over, outputs=[])
        _over.upon(cancel, enter=_over, outputs=[])
        _over.upon(pause, enter=_over, outputs=[])
    del _over
